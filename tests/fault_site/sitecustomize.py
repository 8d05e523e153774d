"""Installs a fault of tests/fault_hooks.py in every Python process started with this folder and tests/ on
PYTHONPATH and CTKD_TEST_KILL set: how the launcher tests reach the training processes that torchrun starts."""
import os

if os.environ.get("CTKD_TEST_KILL"):
    import fault_hooks

    fault_hooks.install(os.environ["CTKD_TEST_KILL"])
