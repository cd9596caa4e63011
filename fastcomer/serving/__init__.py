"""Serving: in-flight batching over the decoding engine (`Scheduler`, usable without HTTP) and
the HTTP service of `fastcomer serve` (`fastcomer.serving.app`, needs `fastcomer[serve]`)."""
from .scheduler import QueueFull, Request, Scheduler, SchedulerClosed

__all__ = ["QueueFull", "Request", "Scheduler", "SchedulerClosed"]
