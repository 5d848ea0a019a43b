"""Door to ``otprune bench selectors`` (otprune.bench.selectors); needs otprune installed."""

from otprune.bench.selectors import main

if __name__ == "__main__":
    main()
