"""Door to ``otprune bench prefill`` (otprune.bench.prefill); needs otprune installed."""

from otprune.bench.prefill import main

if __name__ == "__main__":
    main()
