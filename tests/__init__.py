# Makes tests/ a package so that worker processes of hecate.testing.pool can import test functions.
