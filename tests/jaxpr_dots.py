"""The dot_general equations of a jaxpr, for tests that check what dtypes products run in."""
import jax


def dots(jaxpr):
  """Every dot_general equation of a jaxpr, nested calls included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from dots(sub)


def dot_dtypes(jaxpr):
  """(lhs, rhs, sums) dtype names of every dot_general: sums is preferred_element_type, or the
  output's dtype where none is asked for."""
  for eqn in dots(jaxpr):
    preferred = eqn.params["preferred_element_type"]
    yield (*(str(v.aval.dtype) for v in eqn.invars),
           str(preferred if preferred is not None else eqn.outvars[0].aval.dtype))
