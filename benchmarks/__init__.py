"""Speed and memory benchmarks of dynlrp-fx against gradient x input, Zennit, Captum and LXT.

Run ``python -m benchmarks.run --help``. Benchmarks live outside the test suite; every number they print is
measured in the same process, interleaved, so ratios between methods are meaningful even on a noisy machine.
"""
