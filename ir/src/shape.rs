//! Symbolic shapes. A dimension is an affine expression over named symbols
//! (`B`, `T`, `P+T`, `2*T`, `576`): enough for batch, sequence and KV-cache lengths and the
//! concatenation of a cache with new keys, while staying decidable: two dims are equal iff
//! their canonical forms are equal.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// `constant + Σ coef·symbol`, kept canonical: symbols sorted, no zero coefficients.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    constant: i64,
    terms: Vec<(String, i64)>,
}

impl Dim {
    pub fn c(value: i64) -> Dim {
        Dim {
            constant: value,
            terms: Vec::new(),
        }
    }

    pub fn sym(name: &str) -> Dim {
        Dim {
            constant: 0,
            terms: vec![(name.to_string(), 1)],
        }
    }

    fn from_map(constant: i64, map: BTreeMap<String, i64>) -> Dim {
        Dim {
            constant,
            terms: map.into_iter().filter(|(_, c)| *c != 0).collect(),
        }
    }

    /// The constant part.
    pub fn constant(&self) -> i64 {
        self.constant
    }

    /// The symbolic part: `(symbol, coefficient)` pairs, sorted by symbol.
    pub fn terms(&self) -> &[(String, i64)] {
        &self.terms
    }

    /// The value if the dim has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        self.terms.is_empty().then_some(self.constant)
    }

    /// The symbol's name if the dim is exactly one symbol.
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.as_slice() {
            [(name, 1)] if self.constant == 0 => Some(name),
            _ => None,
        }
    }

    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|(s, _)| s.as_str())
    }

    pub fn add(&self, other: &Dim) -> Dim {
        let mut map: BTreeMap<String, i64> = self.terms.iter().cloned().collect();
        for (s, c) in &other.terms {
            *map.entry(s.clone()).or_insert(0) += c;
        }
        Dim::from_map(self.constant + other.constant, map)
    }

    pub fn scale(&self, k: i64) -> Dim {
        Dim::from_map(
            self.constant * k,
            self.terms.iter().map(|(s, c)| (s.clone(), c * k)).collect(),
        )
    }

    /// Replaces the bound symbols by their values, keeping the others symbolic.
    pub fn substitute(&self, bindings: &HashMap<String, i64>) -> Dim {
        let mut out = Dim::c(self.constant);
        for (s, c) in &self.terms {
            let term = match bindings.get(s) {
                Some(v) => Dim::c(v * c),
                None => Dim::sym(s).scale(*c),
            };
            out = out.add(&term);
        }
        out
    }

    /// Evaluates under `bindings`; `Err(symbol)` names an unbound symbol.
    pub fn eval(&self, bindings: &HashMap<String, i64>) -> Result<i64, String> {
        let mut v = self.constant;
        for (s, c) in &self.terms {
            v += c * bindings.get(s).ok_or_else(|| s.clone())?;
        }
        Ok(v)
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Dim {
        Dim::c(v)
    }
}

impl From<usize> for Dim {
    fn from(v: usize) -> Dim {
        Dim::c(v as i64)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (s, c) in &self.terms {
            let (neg, mag) = (*c < 0, c.unsigned_abs());
            match (first, neg) {
                (true, true) => f.write_str("-")?,
                (false, true) => f.write_str("-")?,
                (false, false) => f.write_str("+")?,
                (true, false) => {}
            }
            if mag != 1 {
                write!(f, "{mag}*")?;
            }
            f.write_str(s)?;
            first = false;
        }
        if first {
            write!(f, "{}", self.constant)
        } else if self.constant > 0 {
            write!(f, "+{}", self.constant)
        } else if self.constant < 0 {
            write!(f, "-{}", -self.constant)
        } else {
            Ok(())
        }
    }
}

/// A tensor shape: a list of dims, outermost first (row-major).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn new(dims: Vec<Dim>) -> Shape {
        Shape(dims)
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// Evaluates every dim under `bindings`.
    pub fn eval(&self, bindings: &HashMap<String, i64>) -> Result<Vec<usize>, String> {
        self.0
            .iter()
            .map(|d| {
                let v = d.eval(bindings)?;
                usize::try_from(v).map_err(|_| format!("dimension {d} evaluates to {v} < 0"))
            })
            .collect()
    }

    /// Whether two shapes provably hold the same number of elements: the products of their
    /// constant dims agree and their symbolic dims are the same multiset.
    pub fn same_numel(&self, other: &Shape) -> bool {
        fn canon(s: &Shape) -> (i128, Vec<&Dim>) {
            let mut k: i128 = 1;
            let mut syms = Vec::new();
            for d in &s.0 {
                match d.as_const() {
                    Some(c) => k *= c as i128,
                    None => syms.push(d),
                }
            }
            syms.sort();
            (k, syms)
        }
        let (a, b) = (canon(self), canon(other));
        a == b || (a.0 == 0 && b.0 == 0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_print_canonically() {
        let pt = Dim::sym("P").add(&Dim::sym("T"));
        assert_eq!(pt.to_string(), "P+T");
        assert_eq!(Dim::sym("T").scale(2).add(&Dim::c(1)).to_string(), "2*T+1");
        assert_eq!(Dim::c(0).sub_for_test(&Dim::sym("T")).to_string(), "-T");
        assert_eq!(Dim::sym("T").add(&Dim::sym("T").scale(-1)), Dim::c(0));
    }

    impl Dim {
        fn sub_for_test(&self, o: &Dim) -> Dim {
            self.add(&o.scale(-1))
        }
    }

    #[test]
    fn numel_is_compared_symbolically() {
        let a = Shape(vec![Dim::sym("B"), Dim::sym("T"), Dim::c(9), Dim::c(64)]);
        let b = Shape(vec![Dim::sym("B"), Dim::sym("T"), Dim::c(576)]);
        let c = Shape(vec![Dim::sym("T"), Dim::c(576)]);
        assert!(a.same_numel(&b));
        assert!(!a.same_numel(&c));
    }
}
