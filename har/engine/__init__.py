"""Training: the epoch loop, its steps (single run, serial pack, fused pack), the numerics a run trains in, and
distributed set-up; it stands on the run layer (`har.run`), which assembles what it trains."""
