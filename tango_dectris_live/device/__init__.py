"""The DectrisLive Tango device: a thin translation of Tango calls onto the layers below."""
