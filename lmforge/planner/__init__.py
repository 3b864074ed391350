"""lmforge.planner."""
