"""`python -m fake_fal`: see `fake_fal.cli`."""

from fake_fal.cli import main

if __name__ == "__main__":
    main()
