"""``gpuflm view``: render an image to PNG with beam, spots, predictions, masks and rings."""

from __future__ import annotations

import argparse

from . import print_json

NAME = "view"
ORDER = 90
HELP = "render an image to PNG with overlays"
DESCRIPTION = ("Render one image of the session to PNG (dark spots on white) with any of: the direct beam, "
               "spots found, predicted reflections (fulls and partials in different colours), masked pixels, the "
               "spot-search annulus, resolution rings, ice rings; zoom to a region; mark a reflection.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..report.images import OVERLAYS

    p.add_argument("session", metavar="SESSION_DIR")
    p.add_argument("image", type=int, metavar="IMAGE_NUMBER")
    p.add_argument("--sector", type=int, default=1, help="sector (default 1)")
    p.add_argument("-o", "--output", metavar="FILE.png", help="where to write (default SESSION/images/...)")
    p.add_argument("--show", default="beam,spots,predictions,mask,resolution",
                   help=f"comma-separated overlays from {','.join(OVERLAYS)} (default %(default)s)")
    p.add_argument("--contrast", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="counts shown white and black (default automatic)")
    p.add_argument("--region", nargs=4, type=int, metavar=("X0", "X1", "Y0", "Y1"), help="zoom to these pixels")
    p.add_argument("--hkl", nargs=3, type=int, metavar=("H", "K", "L"), help="locate and mark this reflection")
    p.add_argument("--width", type=int, default=1000, help="picture width in pixels (default 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.png if it exists")


def run(args: argparse.Namespace) -> int:
    from ..driver.viewing import view_image

    show = [s.strip() for s in args.show.split(",") if s.strip()]
    if args.hkl:
        show.append("hkl")
    doc = view_image(args.session, args.image, sector=args.sector, output=args.output, show=show,
                     contrast=tuple(args.contrast) if args.contrast else None, region=args.region,
                     hkl=args.hkl, width=args.width, overwrite=args.overwrite)
    if args.json:
        print_json(doc)
    else:
        print(f"Wrote {doc['png']} ({doc['spots_shown']} spots shown)")
    return 0
