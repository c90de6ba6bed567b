"""semisup: billion-scale semi-supervised learning (Yalniz et al., 2019) over object storage.

This package does all the work and never imports Airflow; the Airflow side lives in plugins/ and dags/.
"""
