"""Runs one fuzz target (targets.py) under atheris, or replays inputs.

    python fuzz/harness.py TARGET [CORPUS_DIR ...] [libFuzzer flags]   # atheris
    python fuzz/harness.py TARGET --replay PATH ...                    # plain Python

Replay runs the target once over each file (a directory: each file in it),
with no dependency beyond fastproxy: CI's check that the harnesses work, and
the way to rerun a crash file atheris wrote. fuzz/README.md has the rest.
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import targets  # noqa: E402


def replay(target, paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, name) for name in os.listdir(path))
        else:
            files.append(path)
    t0 = time.monotonic()
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            target(data)
        except Exception:
            print("harness: %s failed on %s" % (target.__name__, path), file=sys.stderr)
            raise
    print("harness: %s: %d inputs replayed in %.2f s, no failure" % (target.__name__, len(files),
                                                                    time.monotonic() - t0))


def main(argv):
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        sys.exit("usage: harness.py {%s} [--replay] PATH... [libFuzzer flags]" % ",".join(targets.TARGETS))
    name, rest = argv[1], argv[2:]
    if "--replay" in rest:
        targets.load()
        replay(targets.TARGETS[name], [a for a in rest if a != "--replay"])
        return
    try:
        import atheris
    except ImportError:
        sys.exit("harness: atheris is not installed (pip install atheris); "
                 "--replay runs the target over a corpus without it")
    # Setup first: it loads libFuzzer (or finds the one preloaded for an
    # instrumented extension, fuzz/build.sh) before the extension is loaded.
    atheris.Setup([argv[0] + " " + name] + rest, targets.TARGETS[name])
    with atheris.instrument_imports(include=["fastproxy"]):
        targets.load()
    if name == "client_hello" and not hasattr(targets._core, "parse_client_hello"):
        sys.exit("harness: this build has no _core.parse_client_hello (the SNI routing branch)")
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
