from setuptools import find_packages, setup

about = {}
with open('kazoo_green/_version.py') as f:
    exec(f.read(), about)

with open('requirements.txt') as f:
    requires = [line.strip() for line in f if line.strip() and not line.startswith('#')]

setup(
    name='kazoo_green',
    version=about['__version__'],
    description="Kazoo-style AMQP (RabbitMQ) connector for Kamailio's Python scripts, "
                'on gevent + kombu',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['kazoo_green', 'kazoo_green.*']),
    python_requires='>=3.9',
    install_requires=requires,
    # Optional: kazoo_green.metrics (a Prometheus endpoint for processes outside Kamailio).
    extras_require={'prometheus': ['prometheus_client>=0.16,<1']},
    entry_points={'console_scripts': ['kazoo-green = kazoo_green.cli:main']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Communications :: Telephony',
        'Framework :: Gevent',
    ],
)
