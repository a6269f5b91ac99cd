"""The producer library testbed services import to publish usage events."""

from emitter.emitter import DeliveryFailed, Emitter, InvalidEvent

__all__ = ["DeliveryFailed", "Emitter", "InvalidEvent"]
