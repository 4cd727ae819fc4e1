//! Label selectors as the API server accepts them: `k`, `!k`, `k=v`, `k==v`, `k!=v`,
//! `k in (a,b)`, `k notin (a,b)`, comma-separated.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector(Vec<Req>);

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut reqs = Vec::new();
        let mut rest = s.trim();
        while !rest.is_empty() {
            // Split at the next comma outside parentheses.
            let mut depth = 0;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    c == ',' && depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(rest.len());
            reqs.push(parse_req(rest[..end].trim())?);
            rest = rest[end..].trim_start_matches(',').trim();
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
            Req::Eq(k, v) => get(k) == Some(v),
            Req::NotEq(k, v) => get(k) != Some(v),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        })
    }
}

fn parse_req(s: &str) -> Result<Req, String> {
    if let Some(k) = s.strip_prefix('!') {
        return Ok(Req::NotExists(k.trim().to_string()));
    }
    for (op, ctor) in [(" notin ", true), (" in ", false)] {
        if let Some((k, vs)) = s.split_once(op) {
            let vs = vs
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or(format!("bad set in {s:?}"))?;
            let vs = vs.split(',').map(|v| v.trim().to_string()).collect();
            let k = k.trim().to_string();
            return Ok(if ctor {
                Req::NotIn(k, vs)
            } else {
                Req::In(k, vs)
            });
        }
    }
    if let Some((k, v)) = s.split_once("!=") {
        return Ok(Req::NotEq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = s.split_once("==").or_else(|| s.split_once('=')) {
        return Ok(Req::Eq(k.trim().into(), v.trim().into()));
    }
    if s.is_empty() || s.contains(' ') {
        return Err(format!("unable to parse requirement {s:?}"));
    }
    Ok(Req::Exists(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_match() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "x"}}});
        for (s, want) in [
            ("a", true),
            ("!a", false),
            ("a=1", true),
            ("a==2", false),
            ("a!=2", true),
            ("b in (x,y)", true),
            ("b notin (x)", false),
            ("a=1,b=x", true),
            ("a=1,c", false),
            ("", true),
        ] {
            assert_eq!(Selector::parse(s).unwrap().matches(&o), want, "{s}");
        }
        assert!(Selector::parse("a b").is_err());
    }
}
