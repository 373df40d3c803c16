#!/usr/bin/env bash
# Builds, in a copy of the tree (default fuzz/build/tree), the extension with
# clang's coverage instrumentation for libFuzzer (-fsanitize=fuzzer-no-link),
# and libFuzzer as a shared library to
# preload (clang's libclang_rt.fuzzer_no_main, the build atheris documents
# for native extensions). Without it atheris sees the Python code's
# coverage only, and the C parsers are a black box to it.
#
#   fuzz/build.sh [DIR]        # then the command it prints
#
# Not with AddressSanitizer: preloading its runtime next to libFuzzer gives
# the coverage hooks to ASan's stubs and the fuzzer goes blind (atheris says
# so). Over-reads are caught without it (targets.py parses each input ending
# at a PROT_NONE page), and the corpus a run leaves can be replayed under the
# ASan build: .ci/sanitize with FASTPROXY_FUZZ_CORPUS (fuzz/README.md).
# Needs clang (Debian: apt-get install clang) and atheris.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-fuzz/build}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rt=$(dirname "$(clang -print-file-name=libclang_rt.fuzzer_no_main-x86_64.a)")
[ -f "$rt/libclang_rt.fuzzer_no_main-x86_64.a" ] || rt=$(ls -d /usr/lib/llvm-*/lib/clang/*/lib/linux | tail -1)
clang++ -shared -o "$out/libfuzzer.so" -Wl,--whole-archive "$rt/libclang_rt.fuzzer_no_main-x86_64.a" \
    -Wl,--no-whole-archive -lpthread
rm -rf "$out/tree" && mkdir "$out/tree"
tar --exclude=./.git --exclude=./build --exclude=./fuzz/build --exclude='*.so' -cf - . | tar -xf - -C "$out/tree"
flags="-fsanitize=fuzzer-no-link -g"
preload="$out/libfuzzer.so"
(cd "$out/tree" && CC=clang LDSHARED="clang -shared" CFLAGS="$flags" LDFLAGS="$flags" \
    python setup.py build_ext --inplace -q >build.log 2>&1) || { cat "$out/tree/build.log"; exit 1; }
cat <<EOT
Built $out/tree/src/fastproxy/_core (with $flags). Run a target with:
  LD_PRELOAD="$preload" \\
      python $out/tree/fuzz/harness.py proxy_header NEW_DIR fuzz/corpus/proxy_header -max_total_time=600
EOT
