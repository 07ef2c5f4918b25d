"""`python -m clara.tiny`, kept for existing commands: the builder is clara.training.tiny."""

from clara.training.tiny import main

if __name__ == "__main__":
    main()
