"""``python -m photosim``: the command line, where the ``photosim`` script is not on PATH (a copied tree)."""

from photosim.cli import main

if __name__ == "__main__":
    main()
