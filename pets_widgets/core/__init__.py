"""What every trust domain shares and nothing else: the data dictionary (schema), query specs,
errors, the policy, Paillier/packing/signature primitives, the Release and ParameterCard value
types and the JSON wire format. ``core`` imports nothing else of pets_widgets."""
