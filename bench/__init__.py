"""Benchmarks (run as scripts) and the simulated peers they and the scale test share (bench/simulated.py)."""
