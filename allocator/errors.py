"""Exceptions raised by the allocator."""


class AllocatorError(Exception):
    """Base class of every allocator error; also raised for backend (libc / driver) failures."""


class PoolExhaustedError(AllocatorError):
    """The pool has fewer free physical pages than a request needs; nothing was changed."""


class MappingError(AllocatorError, ValueError):
    """A map / unmap / share request is invalid (out of range, double map, page not mapped, ...)."""
