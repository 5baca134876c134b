"""Tests of the plain-Python core and the engine in process: no server."""
