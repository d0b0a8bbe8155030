"""X-ray attenuation coefficients of detector sensor materials.

Mass attenuation coefficients mu/rho (cm^2/g, total with coherent scattering)
of NIST XCOM / Hubbell & Seltzer (public-domain tables, the same values cctbx
and therefore DIALS use), interpolated log-log in energy. Compounds (CdTe,
GaAs) mix their elements by mass fraction.
"""

from __future__ import annotations

import math
from bisect import bisect_right

#: element -> (density g/cm^3, ((energy keV, mu/rho cm^2/g), ...)); edges appear twice.
_ELEMENTS = {
    "Si": (2.33, ((1, 1570), (1.5, 535.5), (1.8389, 309.2), (1.8389, 3192), (2, 2777), (3, 978.4), (4, 452.9), (5, 245), (6, 147), (8, 64.68), (10, 33.89), (15, 10.34), (20, 4.464), (30, 1.436), (40, 0.7012), (50, 0.4385), (60, 0.3207), (80, 0.2228), (100, 0.1835), (150, 0.1448), (200, 0.1275), (300, 0.1082), (400, 0.09614), (500, 0.08748), (600, 0.08077), (800, 0.07082), (1000, 0.06361),)),
    "Ge": (5.323, ((1, 1893), (1.10304, 1502), (1.2167, 1190), (1.2167, 4389), (1.23215, 4734), (1.2478, 4974), (1.2478, 6698), (1.32844, 6348), (1.4143, 5554), (1.4143, 6287), (1.5, 5475), (2, 2711), (3, 961.3), (4, 449.7), (5, 247.2), (6, 150.9), (8, 68.9), (10, 37.42), (11.1031, 28.11), (11.1031, 198.1), (15, 91.52), (20, 42.22), (30, 13.85), (40, 6.207), (50, 3.335), (60, 2.023), (80, 0.9501), (100, 0.555), (150, 0.2491), (200, 0.1661), (300, 0.1131), (400, 0.09327), (500, 0.08212), (600, 0.07452), (800, 0.06426), (1000, 0.05727),)),
    "Ga": (5.904, ((1, 1697), (1.05613, 1492), (1.1154, 1312), (1.1154, 3990), (1.12877, 4887), (1.1423, 5664), (1.1423, 7405), (1.21752, 7138), (1.2977, 6358), (1.2977, 7206), (1.5, 5087), (2, 2515), (3, 885.7), (4, 413), (5, 226.6), (6, 138.2), (8, 63.02), (10, 34.21), (10.3671, 30.99), (10.3671, 221.4), (15, 85.37), (20, 39.28), (30, 12.81), (40, 5.726), (50, 3.076), (60, 1.868), (80, 0.8823), (100, 0.5197), (150, 0.2387), (200, 0.1619), (300, 0.1123), (400, 0.09325), (500, 0.08236), (600, 0.07487), (800, 0.06466), (1000, 0.05767),)),
    "As": (5.73, ((1, 2121), (1.15026, 1523), (1.3231, 1092), (1.3231, 4513), (1.34073, 4469), (1.3586, 4452), (1.3586, 6093), (1.5, 5227), (1.5265, 4997), (1.5265, 5653), (2, 2931), (3, 1049), (4, 492), (5, 270.9), (6, 165.6), (8, 75.73), (10, 41.15), (11.8667, 25.77), (11.8667, 179.2), (15, 98.56), (20, 45.64), (30, 15.06), (40, 6.76), (50, 3.635), (60, 2.203), (80, 1.03), (100, 0.5971), (150, 0.2622), (200, 0.1719), (300, 0.115), (400, 0.09414), (500, 0.08259), (600, 0.07483), (800, 0.0644), (1000, 0.05735),)),
    "Cd": (8.65, ((1, 7350), (1.5, 2931), (2, 1473), (3, 541.4), (3.5375, 357.5), (3.5375, 1152), (3.63101, 1083), (3.727, 1013), (3.727, 1389), (4, 1170), (4.018, 1157), (4.018, 1324), (5, 768.5), (6, 479.3), (8, 225.4), (10, 124.4), (15, 41.78), (20, 19.2), (26.7112, 8.809), (26.7112, 50.65), (30, 37.65), (40, 17.78), (50, 9.779), (60, 5.975), (80, 2.751), (100, 1.524), (150, 0.5593), (200, 0.3038), (300, 0.1571), (400, 0.1129), (500, 0.0925), (600, 0.08064), (800, 0.0667), (1000, 0.05826),)),
    "Te": (6.24, ((1, 8434), (1.003, 8380), (1.006, 8326), (1.006, 8684), (1.5, 3608), (2, 1832), (3, 679.2), (4, 329.7), (4.3414, 267.8), (4.3414, 788.2), (4.47465, 750.4), (4.612, 699.5), (4.612, 944.5), (4.7728, 878.2), (4.9392, 806.2), (4.9392, 929.2), (5, 901.4), (6, 572.1), (8, 270.2), (10, 150.1), (15, 50.78), (20, 23.41), (30, 7.878), (31.8138, 6.738), (31.8138, 37.19), (40, 20.64), (50, 11.45), (60, 7.041), (80, 3.255), (100, 1.801), (150, 0.6492), (200, 0.3429), (300, 0.1679), (400, 0.1163), (500, 0.09328), (600, 0.08022), (800, 0.06538), (1000, 0.05669),)),
}

#: compound -> (density g/cm^3, {element: mass fraction})
_COMPOUNDS = {
    "CdTe": (5.85, {"Cd": 112.414 / (112.414 + 127.60), "Te": 127.60 / (112.414 + 127.60)}),
    "GaAs": (5.3176, {"Ga": 69.723 / (69.723 + 74.9216), "As": 74.9216 / (69.723 + 74.9216)}),
}

_ALIASES = {"silicon": "Si", "sillicon": "Si", "si": "Si", "cdte": "CdTe", "gaas": "GaAs", "ge": "Ge", "germanium": "Ge"}

KEV_ANGSTROM = 12.398419843320026


def _mu_rho(element: str, energy_kev: float) -> float:
    _, table = _ELEMENTS[element]
    energies = [e for e, _ in table]
    if not energies[0] <= energy_kev <= energies[-1]:
        raise ValueError(f"photon energy {energy_kev:.3f} keV outside the attenuation table of {element}")
    i = min(max(bisect_right(energies, energy_kev) - 1, 0), len(table) - 2)
    (e0, m0), (e1, m1) = table[i], table[i + 1]
    if e1 == e0:
        return m1
    f = (math.log(energy_kev) - math.log(e0)) / (math.log(e1) - math.log(e0))
    return math.exp(math.log(m0) + f * (math.log(m1) - math.log(m0)))


def canonical_material(material: str) -> str:
    """'Silicon', 'si' -> 'Si'; 'CdTe', 'GaAs', 'Ge' likewise."""
    key = material.strip()
    return _ALIASES.get(key.lower(), key)


def attenuation_per_mm(material: str, wavelength: float) -> float:
    """Linear attenuation coefficient mu (1/mm) of ``material`` at ``wavelength`` (A).

    Raises
    ------
    ValueError
        Unknown material or an energy outside the tables (1 keV - 1 MeV).
    """
    name = canonical_material(material)
    energy = KEV_ANGSTROM / wavelength
    if name in _ELEMENTS:
        density = _ELEMENTS[name][0]
        mu_rho = _mu_rho(name, energy)
    elif name in _COMPOUNDS:
        density, parts = _COMPOUNDS[name]
        mu_rho = sum(w * _mu_rho(el, energy) for el, w in parts.items())
    else:
        known = sorted(set(_ELEMENTS) | set(_COMPOUNDS))
        raise ValueError(f"unknown sensor material {material!r}; known: {', '.join(known)}")
    return mu_rho * density / 10.0  # 1/cm -> 1/mm
