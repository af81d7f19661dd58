"""The Python bytecodes code runs, per function (``sys.settrace`` with opcode events):
a count that does not depend on the machine's noise (bench/query_cost.py,
bench/resume_cost.py)."""

import os


def opcode_tracer(counts):
    """A trace function adding one to ``counts['<file>:<function>']`` per bytecode run."""
    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == 'opcode':
            code = frame.f_code
            counts['%s:%s' % (os.path.basename(code.co_filename), code.co_name)] += 1
        return tracer
    return tracer
