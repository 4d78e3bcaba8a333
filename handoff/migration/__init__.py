"""The two roles of a handoff (DESIGN section 7, layer L4): `source` and `target` drive the
protocol over a transport and the machine; `peer` joins a protocol machine to a channel;
`messages` maps the machine's objects to protocol messages; `record` is what one handoff did;
`faults` injects failures at named steps."""
