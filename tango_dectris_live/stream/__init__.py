"""DECTRIS stream formats: message model, stream v1 and v2 parsing, frame decoding."""
