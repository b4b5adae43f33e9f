"""The release pipeline: from decrypted totals to a release, by noise and post-processing only
(noise, suppression, tables, survival, incidence)."""
