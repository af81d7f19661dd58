"""bench/compare.py's "floor-async": floor.py's answer given from a second Python route.

The SIP worker's route suspends the INVITE's transaction with the async module's
``task_route`` (no AMQP, no I/O: Kamailio's core async framework hands it to an idle async
worker at once); the worker resumes it in ``resume`` and answers 302 as floor.py does. So
this is the least that any design with a Python request route and a Python resume route
costs per call: kg-async's own query, JSON and acks come on top.
"""

import KSR
from floor import Floor


#: KSR.async: a keyword in Python 3, so the submodule is reached with getattr.
ASYNC = getattr(KSR, 'async')


class FloorAsync(Floor):

    def invite(self):
        if ASYNC.task_route('resume') < 0:
            KSR.tm.t_reply(500, 'Server Error')

    def resume(self, msg):
        """Run by an async worker with the suspended transaction."""
        Floor.invite(self)
        return 1


def mod_init():
    return FloorAsync()
