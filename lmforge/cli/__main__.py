"""``python -m lmforge.cli``: the same as ``python -m lmforge`` and the ``lmforge`` script."""

from lmforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
