"""Python classes generated from yang/ by pyangbind (`make bindings`).

Never edit the generated modules by hand: tests/test_bindings.py fails when
they differ from what the current YANG produces.  They are for scripts and
small typed configurations (an OSS building a VPN, the demo); the servers'
datastores validate with libyang instead (nc_core.schema), which is ~50x
faster and also checks must, when, mandatory and unique.
"""
