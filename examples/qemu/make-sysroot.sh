#!/usr/bin/env bash
# Make an aarch64 Python for running cross-compiled TVM stages under qemu-user on this machine.
#
#   examples/qemu/make-sysroot.sh DIR
#   partc compile|run|serve ... --qemu-sysroot DIR   # then run aarch64 stages under qemu
#   (or export PARTC_QEMU_SYSROOT=DIR, the option's default)
#
# DIR/root holds Debian's arm64 python3.11 and the libraries it needs (debs unpacked with dpkg -x);
# DIR/site holds the aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy and ml_dtypes, at the versions
# installed in the Python that runs this script (so the emulated runtime matches the compiler).
# The arm64 package index is fetched into DIR/apt with its own apt state: nothing is added to the
# system's dpkg architectures or apt lists, and root is not needed. Needs apt-get and dpkg (Debian 12
# or a derivative with python3.11), pip, and network access; about 350 MB and a minute or two.
# Running it again on a finished DIR does nothing. DIR/complete, written last, names what DIR holds.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
dir=$(realpath -m "$1")
python=${PYTHON:-python3}
fail() { echo "make-sysroot: error: $*" >&2; exit 1; }

versions=$("$python" - <<'EOF' 2>/dev/null
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes")))
EOF
) || fail "$python has no apache-tvm, apache-tvm-ffi, numpy or ml_dtypes installed; install partc[tvm] first (or set PYTHON)"
stamp="aarch64 python3.11 $versions"
if [ -f "$dir/complete" ] && [ "$(cat "$dir/complete")" = "$stamp" ]; then
  echo "$dir is complete ($stamp)"
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null || fail "apt-get and dpkg are needed (Debian/Ubuntu)"
rm -rf "$dir/root" "$dir/site" "$dir/complete"
mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/apt/debs" "$dir/root"
touch "$dir/apt/status"
apt=(apt-get -q -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o "Dir::State::Lists=$dir/apt/lists"
     -o "Dir::State::status=$dir/apt/status" -o "Dir::Cache=$dir/apt/cache" -o Debug::NoLocking=1
     -o APT::Sandbox::User="$(id -un)")
echo "fetching the arm64 package index into $dir/apt"
"${apt[@]}" update >"$dir/apt/update.log" 2>&1 || fail "apt-get update for arm64 failed; see $dir/apt/update.log"
packages=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libssl3 libffi8
          libbz2-1.0 liblzma5 libstdc++6 libgcc-s1 libuuid1 libsqlite3-0 libncursesw6 libtinfo6 libreadline8
          libcrypt1 libzstd1)
echo "downloading ${#packages[@]} arm64 packages"
(cd "$dir/apt/debs" && "${apt[@]}" download "${packages[@]}") >"$dir/apt/download.log" 2>&1 ||
  fail "apt-get download of the arm64 packages failed; see $dir/apt/download.log"
for deb in "$dir"/apt/debs/*.deb; do
  dpkg -x "$deb" "$dir/root"
done
echo "installing aarch64 wheels into $dir/site: $versions"
# shellcheck disable=SC2086  # $versions is a list of requirements
"$python" -m pip install -q --target "$dir/site" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
  --only-binary=:all: --python-version 3.11 --implementation cp $versions typing_extensions \
  >"$dir/apt/pip.log" 2>&1 || fail "pip install of the aarch64 wheels failed; see $dir/apt/pip.log"
rm -rf "$dir/apt/debs" "$dir/apt/cache" "$dir/apt/lists"
echo "$stamp" >"$dir/complete"
echo "$dir is complete ($stamp): $(du -sh "$dir" | cut -f1)"
