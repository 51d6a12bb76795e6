"""`python -m fake_replicate`: see `fake_replicate.cli`."""

from fake_replicate.cli import main

if __name__ == "__main__":
    main()
