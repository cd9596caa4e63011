from setuptools import find_packages, setup

setup(
    name="fastcomer",
    version="0.1.0",
    description="Fused GPU kernels and a fast decoding engine for CoMER (handwritten maths recognition)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastcomer", "fastcomer.*"]),
    package_data={"fastcomer": ["dictionary.txt"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "bench": ["pytest-benchmark", "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["fastcomer = fastcomer.__main__:main"]},
)
