"""`llmasos data prepare`: recipes (recipe.py) of steps (steps.py, scrub.py, decontaminate.py,
chat.py) run over a stored dataset into a new one (run.py)."""
