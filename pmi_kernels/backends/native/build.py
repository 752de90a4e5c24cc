"""python -m pmi_kernels.backends.native.build [--force]: make the C++ (and CUDA) kernels ready now and say
where they are, or why not (with the compiler's output). It retries a build that failed before (a failure the
cache remembers); --force rebuilds the just-in-time cache entry even where a good library is there."""

import sys

from . import extension


def main() -> int:
    force = "--force" in sys.argv[1:]
    reason = extension.load(force_build=force, retry_failed=True)
    if reason is not None:
        failure = extension.build_dir(extension.cuda_wanted()) / extension.FAILURE_MARKER
        print(f"pmi_kernels: {reason}", file=sys.stderr)
        error = extension.remembered_failure(failure.parent)
        if error:
            print(error[-4000:], file=sys.stderr)
        return 1
    kernels = "C++ and CUDA" if extension.built_with_cuda() else "C++"
    print(f"pmi_kernels: {kernels} kernels ready in {extension.loaded_from()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
