"""python -m pmi_kernels.backends.native.build: build the C++ (and CUDA) kernels now, into the
cache the library loads them from, and say where, or why not (with the compiler's output)."""
import sys

from . import extension


def main() -> int:
    reason = extension.load(force_build="--force" in sys.argv)
    if reason is not None:
        failure = extension.build_dir(extension.cuda_wanted()) / "BUILD_FAILED"
        print(f"pmi_kernels: {reason}", file=sys.stderr)
        if failure.exists():
            print(failure.read_text()[-4000:], file=sys.stderr)
        return 1
    kernels = "C++ and CUDA" if extension.cuda_wanted() else "C++"
    print(f"pmi_kernels: {kernels} kernels ready in {extension.build_dir(extension.cuda_wanted())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
