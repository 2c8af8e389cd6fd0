"""Calibration data: text sources (``text``) and the token windows cut from them (``windows``)."""
