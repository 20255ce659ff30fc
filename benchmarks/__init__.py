"""Benchmarks of spice-libvirt; each ``bench_*.py`` is a script (see RESULTS.md)."""
