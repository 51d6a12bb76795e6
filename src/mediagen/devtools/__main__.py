"""`python -m mediagen.devtools` (what `make run` runs): see `mediagen.devtools.launcher`."""

from mediagen.devtools.launcher import main

if __name__ == "__main__":
    main()
