"""The one native part: kvmstub's simulated SEV hardware crypto (kvmstub/_sevcrypto.c), built
against the system's OpenSSL (libssl-dev). Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvmstub._sevcrypto",
            sources=["kvmstub/_sevcrypto.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
        )
    ]
)
