"""Evaluation: perplexity on local text files and lm-eval tasks."""

from .perplexity import perplexity, read_text
from .tasks import Task, check_windows, evaluate, load_for_eval, parse_tasks, results_table, save_results

__all__ = ["Task", "check_windows", "evaluate", "load_for_eval", "parse_tasks", "perplexity", "read_text", "results_table", "save_results"]
