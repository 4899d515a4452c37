"""``python -m infergate``: the command line."""

from infergate.gateway.cli import main

if __name__ == "__main__":
    main()
