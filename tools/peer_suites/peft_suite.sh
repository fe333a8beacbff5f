#!/usr/bin/env bash
# peft's own add_weighted_adapter tests, unpatched and with pykernels' peft patch (DESIGN.md section 7).
#
#   tools/peer_suites/peft_suite.sh            # from a pykernels checkout with pykernels._C built
#
# Gets peft's source distribution (pip download --no-binary :all: --no-deps peft==$PEFT_VERSION) into
# $PEER_CACHE (default /tmp/pykernels-peer-cache), unpacks it, installs the test-only dependency diffusers
# (--no-deps, pinned, into $PEER_CACHE/site, never into site-packages, so pip cannot touch torch) when it is not
# importable, then runs tests/test_custom_models.py -k "weighted_adapter or weighted_combination" twice with
# peft imported from the unpacked sources: unpatched, then with -p peft_plugin (pykernels.integrations.peft.patch()
# at startup). Prints both runs' counts side by side and every test that fails only when patched.
# After the first run everything is cached and the script runs offline (HF_HUB_OFFLINE=1).
# Exit status: 0 when no test fails patched that passes unpatched, 1 otherwise, 2 on a setup error.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python}
PEFT_VERSION=${PEFT_VERSION:-0.21.2}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
CACHE=${PEER_CACHE:-/tmp/pykernels-peer-cache}
SELECT=${PEFT_SELECT:-weighted_adapter or weighted_combination}
TESTS=tests/test_custom_models.py

mkdir -p "$CACHE"
start=$(date +%s)

sdist="$CACHE/peft-$PEFT_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    echo "== downloading peft $PEFT_VERSION sources"
    "$PY" -m pip download --quiet --no-binary :all: --no-deps "peft==$PEFT_VERSION" -d "$CACHE" || {
        echo "peft_suite: could not download peft==$PEFT_VERSION" >&2; exit 2; }
fi
src="$CACHE/peft-$PEFT_VERSION"
if [ ! -f "$src/$TESTS" ]; then
    tar -xzf "$sdist" -C "$CACHE"
fi
# The sdist omits tests/__init__.py, and the test modules import each other relatively.
[ -f "$src/tests/__init__.py" ] || : > "$src/tests/__init__.py"

site="$CACHE/site"
if ! PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import diffusers" >/dev/null 2>&1; then
    echo "== installing diffusers $DIFFUSERS_VERSION (--no-deps) into $site"
    if ! ls "$CACHE"/wheels/diffusers-"$DIFFUSERS_VERSION"-*.whl >/dev/null 2>&1; then
        "$PY" -m pip download --quiet --no-deps "diffusers==$DIFFUSERS_VERSION" -d "$CACHE/wheels" || {
            echo "peft_suite: could not download diffusers==$DIFFUSERS_VERSION" >&2; exit 2; }
    fi
    "$PY" -m pip install --quiet --no-deps --no-index --target "$site" "$CACHE"/wheels/diffusers-"$DIFFUSERS_VERSION"-*.whl
    PYTHONPATH="$site" "$PY" -c "import diffusers" || {
        echo "peft_suite: diffusers is still not importable (a missing dependency?)" >&2; exit 2; }
fi

base_path="$src/src:$site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHONPATH="$base_path" "$PY" - "$PEFT_VERSION" <<'PYEOF' || exit 2
import sys, peft
if peft.__version__ != sys.argv[1]:
    sys.exit(f"peft_suite: imported peft {peft.__version__} from {peft.__file__}, expected {sys.argv[1]}")
PYEOF

run() {  # run NAME [pytest args...]
    local name=$1; shift
    local t0=$(date +%s)
    echo "== $name run"
    (cd "$src" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$base_path:$HERE" \
        "$PY" -m pytest -o addopts="" -p no:cacheprovider -q -rfE "$TESTS" -k "$SELECT" \
        --junitxml="$CACHE/$name.xml" "$@" 2>&1 | tail -n 30) || true
    echo "== $name run: $(( $(date +%s) - t0 )) s"
}
run unpatched
run patched -p peft_plugin

status=0
"$PY" - "$CACHE/unpatched.xml" "$CACHE/patched.xml" <<'PYEOF' || status=$?
import sys
import xml.etree.ElementTree as ET

def results(path):
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                break
        out[name] = (status, message)
    return out

runs = [results(p) for p in sys.argv[1:3]]
print(f"\n{'':10}{'unpatched':>12}{'patched':>12}")
for status in ("passed", "failed", "error", "skipped"):
    counts = [sum(1 for s, _ in r.values() if s == status) for r in runs]
    print(f"{status:10}{counts[0]:>12}{counts[1]:>12}")
print(f"{'total':10}{len(runs[0]):>12}{len(runs[1]):>12}")
regressions = [n for n, (s, _) in runs[1].items() if s in ("failed", "error") and runs[0].get(n, ("",))[0] == "passed"]
for name, (status, message) in sorted(runs[1].items()):
    if status in ("failed", "error"):
        tag = "only patched" if name in regressions else "also unpatched"
        print(f"  {status} ({tag}): {name}: {message}")
sys.exit(1 if regressions else 0)
PYEOF
echo "== peft suite: $(( $(date +%s) - start )) s in all"
exit $status
