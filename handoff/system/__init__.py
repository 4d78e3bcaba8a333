"""The host around a VMM: processes, scheduling, sd_notify, prctl hardening (DESIGN section 7,
layer L1). Nothing here knows of guests or handoffs."""
