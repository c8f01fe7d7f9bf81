"""tango-dectris-live: a Tango device server for DECTRIS detectors with live stream processing."""
__version__ = "0.1.0"
