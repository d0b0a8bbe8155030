"""The MOSFLM tasks as steps: pure functions of (experiment, data, config) returning results.

A step never parses arguments or writes the session; :mod:`gpuflm.driver`
does that around it.
"""
