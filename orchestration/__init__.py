"""Runner, sweeps, trial progress and the results table. Imports stages; stages never import it."""
