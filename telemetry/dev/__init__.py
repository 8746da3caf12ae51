"""Development tools: the synthetic patient generator, the demo, the replay plots.

Never imported by ``serve``.
"""
