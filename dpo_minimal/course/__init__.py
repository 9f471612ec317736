"""The course's teaching labs: modes, the bandit lab, SymPy derivations, plots, the task world.

Nothing here is needed to use `dpo_minimal` as a library; the notebooks import it.
"""
