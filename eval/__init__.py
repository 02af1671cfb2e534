"""Evaluation: benchmark tables (``visadapt-eval``) and, under ``bench/``, speed and memory benchmarks."""
