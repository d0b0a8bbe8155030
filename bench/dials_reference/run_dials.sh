#!/usr/bin/env bash
# Like /work/shared/tools/dials/run.sh, plus Debian's python3-sklearn (+joblib, threadpoolctl),
# which dials.scale/dials.cosym import but which the shared unpack lacks; unpacked privately
# (apt-get download + dpkg -x) into /work/dials_runs/extra/root.
# Also sets CLIBD to $R/usr/share/ccp4 (where symop.lib/syminfo.lib are; run.sh points at .../ccp4/data,
# which does not exist, so dials.merge/dials.export MTZ writing fails there).
set -euo pipefail
PEERS=${PEERS:-$HOME/.cache/gpuflm-peers}
R=$PEERS/dials_root
X=/work/dials_runs/extra/root
export PYTHONPATH=$R/usr/lib/python3/dist-packages:$X/usr/lib/python3/dist-packages
export LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu/openblas-pthread:$R/usr/lib/x86_64-linux-gnu/blas:$R/usr/lib/x86_64-linux-gnu/lapack:$R/usr/lib
export PYTHONNOUSERSITE=1 LIBTBX_BUILD=$R/usr/lib/cctbx/python3.11 CLIBD=$R/usr/share/ccp4
tool=$1; shift
if [[ $tool == python ]]; then exec /usr/bin/python3.11 "$@"; fi
exec /usr/bin/python3.11 -c "import sys; sys.argv[0]='$tool'; from importlib.metadata import entry_points; eps=[e for e in entry_points(group='console_scripts') if e.name=='$tool']; sys.exit(eps[0].load()())" "$@"
