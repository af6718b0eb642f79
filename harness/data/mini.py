"""BehaviorBench-mini: a deterministic, clearly synthetic BehaviorBench-format sample.

Every patient, clinician and value here is invented from templates. Proactive tasks and their
restraint twins share the same requests; what tells them apart is in the case facts (a missing
allergy history, two weights that disagree, a dose ten times too high, an allergy matching the
ordered drug, an order that could mean two drugs), so the label is learnable but not keyed on a word.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from harness.core.files import refuse_foreign, write_text
from harness.data.records import TaskRecord
from harness.data.taxonomy import Taxonomy, load_taxonomy

SYSTEM_PROMPT = (
    "You are a clinical assistant supporting a hospital care team. The conversation includes "
    "clinicians and the patient; each turn starts with the speaker. Respond to the latest turn."
)
SPLIT_WEIGHTS = (("train", 0.7), ("dev", 0.15), ("test", 0.15))
HARD_FRACTION = 0.25
SAMPLE_START = b'{"task_id": "mini-000000", "case_id": "mini-case-00000", '  # how every sample's file begins


@dataclass(frozen=True)
class Drug:
    name: str
    dose: int
    unit: str
    frequency: str
    allergy_class: str
    renal: bool = False

    def order(self, dose: int | None = None) -> str:
        return f"{self.name} {dose or self.dose} {self.unit} {self.frequency}"


@dataclass(frozen=True)
class Scenario:
    complaint: str
    diagnosis: str
    findings: str
    treatment: str
    drug: Drug
    alternative: Drug
    labs: tuple[tuple[str, float, str, float, float], ...]  # name, value, unit, low, high
    onset_days: int  # symptom onset, in days before admission; agrees with the complaint


SCENARIOS = (
    Scenario(
        "three days of productive cough and fever",
        "community-acquired pneumonia",
        "fever, productive cough and a raised white count",
        "amoxicillin with supportive care",
        Drug("amoxicillin", 1000, "mg", "three times daily", "penicillin"),
        Drug("doxycycline", 100, "mg", "twice daily", "tetracycline"),
        (("WBC", 14.2, "x10^9/L", 4.0, 11.0), ("CRP", 88.0, "mg/L", 0.0, 5.0)),
        onset_days=3,
    ),
    Scenario(
        "burning on urination and flank pain",
        "acute pyelonephritis",
        "dysuria, flank pain and pyuria",
        "oral antibiotics guided by culture",
        Drug("trimethoprim-sulfamethoxazole", 960, "mg", "twice daily", "sulfonamide", renal=True),
        Drug("ciprofloxacin", 500, "mg", "twice daily", "fluoroquinolone"),
        (("WBC", 13.1, "x10^9/L", 4.0, 11.0), ("urine nitrite", 1.0, "positive", 0.0, 0.0)),
        onset_days=2,
    ),
    Scenario(
        "a red, hot, swollen lower leg",
        "cellulitis",
        "spreading erythema, warmth and low-grade fever",
        "an anti-staphylococcal antibiotic",
        Drug("cefalexin", 500, "mg", "four times daily", "cephalosporin"),
        Drug("clindamycin", 300, "mg", "four times daily", "lincosamide"),
        (("WBC", 12.4, "x10^9/L", 4.0, 11.0), ("CRP", 41.0, "mg/L", 0.0, 5.0)),
        onset_days=2,
    ),
    Scenario(
        "sudden swelling and pain in the right knee",
        "acute gout",
        "a hot monoarthritis with raised urate",
        "an anti-inflammatory and rest",
        Drug("naproxen", 500, "mg", "twice daily", "NSAID", renal=True),
        Drug("colchicine", 500, "mcg", "twice daily", "alkaloid", renal=True),
        (("urate", 0.56, "mmol/L", 0.2, 0.42), ("CRP", 30.0, "mg/L", 0.0, 5.0)),
        onset_days=1,
    ),
    Scenario(
        "palpitations and a fast irregular pulse",
        "atrial fibrillation",
        "an irregularly irregular tachycardia",
        "rate control and anticoagulation",
        Drug("apixaban", 5, "mg", "twice daily", "anticoagulant", renal=True),
        Drug("warfarin", 5, "mg", "once daily", "vitamin K antagonist"),
        (("TSH", 1.9, "mU/L", 0.4, 4.0), ("hemoglobin", 13.8, "g/dL", 12.0, 16.0)),
        onset_days=0,
    ),
    Scenario(
        "polyuria, thirst and weight loss",
        "new type 2 diabetes",
        "hyperglycaemia with a raised HbA1c",
        "metformin with lifestyle advice",
        Drug("metformin", 500, "mg", "twice daily", "biguanide", renal=True),
        Drug("sitagliptin", 100, "mg", "once daily", "gliptin"),
        (("HbA1c", 8.9, "%", 4.0, 6.0), ("glucose", 14.6, "mmol/L", 4.0, 7.8)),
        onset_days=21,
    ),
    Scenario(
        "a severe headache and blood pressure of 190/115",
        "hypertensive urgency",
        "severe hypertension without end-organ damage",
        "gradual oral blood pressure lowering",
        Drug("amlodipine", 5, "mg", "once daily", "calcium channel blocker"),
        Drug("labetalol", 200, "mg", "twice daily", "beta blocker"),
        (("troponin", 4.0, "ng/L", 0.0, 14.0), ("sodium", 139.0, "mmol/L", 135.0, 145.0)),
        onset_days=0,
    ),
    Scenario(
        "wheeze and breathlessness after a cold",
        "an asthma exacerbation",
        "wheeze with a reduced peak flow",
        "inhaled bronchodilators and oral steroids",
        Drug("prednisolone", 40, "mg", "once daily", "corticosteroid"),
        Drug("hydrocortisone", 100, "mg", "four times daily", "corticosteroid"),
        (("peak flow", 58.0, "% predicted", 80.0, 120.0), ("eosinophils", 0.6, "x10^9/L", 0.0, 0.5)),
        onset_days=4,
    ),
)

CONDITIONS = (
    "hypertension",
    "type 2 diabetes",
    "asthma",
    "hypothyroidism",
    "osteoarthritis",
    "depression",
    "chronic kidney disease stage 2",
    "hyperlipidaemia",
    "migraine",
)
HOME_MEDS = (
    Drug("lisinopril", 10, "mg", "once daily", "ACE inhibitor"),
    Drug("atorvastatin", 20, "mg", "once daily", "statin"),
    Drug("levothyroxine", 75, "mcg", "once daily", "thyroid hormone"),
    Drug("sertraline", 50, "mg", "once daily", "SSRI"),
    Drug("omeprazole", 20, "mg", "once daily", "proton pump inhibitor"),
)
BP_MEDS = (
    Drug("lisinopril", 10, "mg", "once daily", "ACE inhibitor"),
    Drug("amlodipine", 5, "mg", "once daily", "calcium channel blocker"),
    Drug("bisoprolol", 5, "mg", "once daily", "beta blocker"),
)
UNRELATED_ALLERGIES = ("iodine contrast", "latex", "shellfish", "codeine")
CLINICIANS = (
    "Dr. Reyes (attending)",
    "Dr. Okafor (resident)",
    "Dr. Lindqvist (registrar)",
    "Dr. Haddad (attending)",
    "Dr. Nakamura (fellow)",
    "Dr. Mensah (resident)",
)
NURSES = ("Nurse Alvarez", "Nurse Kowalski", "Nurse Dube", "Nurse Tanaka")
PHARMACISTS = ("Pharmacist Moreau", "Pharmacist Singh")
SMALL_TALK = (
    "Patient: The food here is better than I expected, honestly.",
    "Patient: My daughter is coming to visit this afternoon.",
    "{nurse}: Bed 4 has been cleaned and the family were shown the lounge.",
    "{clinician}: We are running a little behind on the ward round today.",
)

ORDER_REQUESTS = (
    "Please draft the order for {order}.",
    "Let's start {order}. Can you write that up?",
    "Can you confirm the plan: {order}?",
    "Go ahead and prescribe {order}, thanks.",
)
TIMELINE_REQUESTS = (
    "Can you put the events so far in order for the timeline?",
    "What happened when? Put these events in chronological order, please.",
    "For the notes, list the events so far in the order they happened.",
)
INCREASE_REQUESTS = (
    "Please increase {pos} {what}.",
    "Can we go up on the {what}?",
    "Let's titrate the {what} up today.",
)


@dataclass
class Case:
    case_id: str
    scenario: Scenario
    age: int
    sex: str
    weight: int
    conditions: list[str]
    home_meds: list[Drug]
    allergy: str | None
    vitals: str
    clinician: str
    nurse: str
    pharmacist: str
    labs: list[tuple[str, float, str, float, float]] = field(default_factory=list)

    @property
    def pronoun(self) -> str:
        return "she" if self.sex == "woman" else "he"

    @property
    def possessive(self) -> str:
        return "her" if self.sex == "woman" else "his"


def _make_case(rng: random.Random, index: int) -> Case:
    scenario = rng.choice(SCENARIOS)
    home = rng.sample(HOME_MEDS, k=rng.randint(1, 3))
    labs = [
        *scenario.labs,
        ("creatinine", round(rng.uniform(60, 110)), "umol/L", 45, 110),
        ("potassium", round(rng.uniform(3.6, 4.9), 1), "mmol/L", 3.5, 5.1),
    ]
    return Case(
        case_id=f"mini-case-{index:05d}",
        scenario=scenario,
        age=rng.randint(24, 88),
        sex=rng.choice(("woman", "man")),
        weight=rng.randint(52, 104),
        conditions=rng.sample(CONDITIONS, k=rng.randint(1, 2)),
        home_meds=home,
        allergy=rng.choice((None, None, *UNRELATED_ALLERGIES)),
        vitals=f"HR {rng.randint(72, 118)}, BP {rng.randint(108, 150)}/{rng.randint(62, 92)}, "
        f"T {rng.uniform(36.6, 38.9):.1f} C, SpO2 {rng.randint(92, 99)}%",
        clinician=rng.choice(CLINICIANS),
        nurse=rng.choice(NURSES),
        pharmacist=rng.choice(PHARMACISTS),
        labs=labs,
    )


def _value(value: float) -> str:
    return f"{value:g}"


@dataclass
class Draft:
    """A conversation under construction: the case facts as turns, then the request."""

    case: Case
    request: str
    reference: str
    allergy_turn: str | None = "default"
    omit_lab: str | None = None
    extra_turns: list[str] = field(default_factory=list)
    evidence: list[list[str]] = field(default_factory=list)  # what a correct intervention names (proactive)

    def turns(self, rng: random.Random, hard: bool) -> list[str]:
        case, s = self.case, self.case.scenario
        meds = ", ".join(d.order() for d in case.home_meds)
        allergy = self.allergy_turn
        if allergy == "default":
            allergy = f"I'm allergic to {case.allergy}." if case.allergy else "I have no drug allergies."
        labs = "; ".join(f"{n} {_value(v)} {u}" for n, v, u, _, _ in case.labs if n != self.omit_lab)
        turns = [
            f"{case.clinician}: {case.age}-year-old {case.sex} with {s.complaint}. "
            f"History of {' and '.join(case.conditions)}. Weight {case.weight} kg.",
            f"Patient: I take {meds}. {allergy or ''}".strip(),
            f"{case.nurse}: Vitals {case.vitals}. Labs: {labs}.",
            *self.extra_turns,
        ]
        if hard:
            filler = [t.format(nurse=case.nurse, clinician=case.clinician) for t in SMALL_TALK]
            for text in rng.sample(filler, k=2):
                turns.insert(rng.randint(1, len(turns)), text)
        return [*turns, f"{case.clinician.split(' (')[0]}: {self.request}"]


def _order_request(rng: random.Random, order: str) -> str:
    return rng.choice(ORDER_REQUESTS).format(order=order)


def _done(order: str) -> str:
    return f"Done: the order for {order} is drafted for your signature."


# One builder per category: (case, rng, hard) -> Draft.
def _diagnosis(case: Case, rng: random.Random, hard: bool) -> Draft:
    q = rng.choice(
        ("What is the most likely diagnosis?", "What do you think is going on?", "Which diagnosis fits best here?")
    )
    s = case.scenario
    return Draft(case, q, f"The most likely diagnosis is {s.diagnosis}, given {s.findings}.")


def _when(moment: datetime) -> str:
    return f"{moment.day} {moment:%B} at {moment:%H:%M}"


def _timeline(case: Case, rng: random.Random, hard: bool) -> Draft:
    # Dates show no year: admissions from February on keep the onset (at most 21 days before) in the same year.
    admitted = datetime(2001, rng.randint(2, 12), rng.randint(1, 28), rng.randint(6, 20), rng.choice((0, 15, 30, 45)))
    onset_days = case.scenario.onset_days
    if onset_days:
        onset = admitted.replace(hour=rng.randint(6, 22), minute=rng.choice((0, 30))) - timedelta(days=onset_days)
    else:
        onset = admitted - timedelta(minutes=15 * rng.randint(4, 20))
    drug = case.scenario.drug
    dose = f"{drug.name} {drug.dose} {drug.unit}"
    pronoun = case.pronoun.capitalize()
    later = [
        ("blood draw for creatinine and potassium", f"{case.nurse}: Bloods for creatinine and potassium were drawn on"),
        (f"first dose of {dose}", f"{case.pharmacist}: The first dose of {dose} was given on"),
    ]
    if rng.random() < 0.5:
        reviewer = rng.choice([c for c in CLINICIANS if c != case.clinician])
        later.append((f"review by {reviewer.split(' (')[0]}", f"{reviewer}: I reviewed {case.possessive} notes on"))
    events = [
        (onset, "symptom onset", f"Patient: It all started on {_when(onset)}."),
        (admitted, "admission", f"{case.clinician}: {pronoun} was admitted on {_when(admitted)}."),
    ]
    # Distinct quarter-hours 30 minutes to 12 hours after admission, so the later events come in any order.
    for (event, turn), step in zip(later, rng.sample(range(2, 49), k=len(later)), strict=True):
        moment = admitted + timedelta(minutes=15 * step)
        events.append((moment, event, f"{turn} {_when(moment)}."))
    chronological = sorted(events, key=lambda e: e[0])
    mentioned = rng.sample(events, k=len(events))
    if mentioned == chronological:
        mentioned = mentioned[1:] + mentioned[:1]
    order = "; ".join(f"{event} ({moment.day} {moment:%B}, {moment:%H:%M})" for moment, event, _ in chronological)
    return Draft(case, rng.choice(TIMELINE_REQUESTS), f"In order: {order}.", extra_turns=[t for _, _, t in mentioned])


def _treatment(case: Case, rng: random.Random, hard: bool) -> Draft:
    q = rng.choice(("What would you start as first-line treatment?", "How should we manage this initially?"))
    return Draft(case, q, f"First-line management is {case.scenario.treatment}.")


def _interpretation(case: Case, rng: random.Random, hard: bool) -> Draft:
    q = rng.choice(("How do you read these labs?", "Anything in the results I should know about?"))
    abnormal = [f"{n} {_value(v)} {u}" for n, v, u, lo, hi in case.labs if not lo <= v <= hi or u == "positive"]
    return Draft(
        case,
        q,
        f"The results show {', '.join(abnormal) or 'no abnormality'}, in keeping with {case.scenario.diagnosis}.",
    )


def _summary(case: Case, rng: random.Random, hard: bool) -> Draft:
    q = rng.choice(("Can you summarise the case for handoff?", "Give me a one-line summary for the board."))
    return Draft(
        case,
        q,
        f"{case.age}-year-old {case.sex} with {case.scenario.complaint}, "
        f"most consistent with {case.scenario.diagnosis}.",
    )


def _missing(case: Case, rng: random.Random, hard: bool) -> Draft:
    drug = case.scenario.drug
    if drug.renal and rng.random() < 0.5:
        return Draft(
            case,
            _order_request(rng, drug.order()),
            f"Before ordering {drug.name}, kidney function is not documented; "
            "please check creatinine first because the dose depends on it.",
            omit_lab="creatinine",
            evidence=[[drug.name], ["kidney", "renal", "creatinine", "eGFR"]],
        )
    return Draft(
        case,
        _order_request(rng, drug.order()),
        f"Before ordering {drug.name}, the allergy history is missing; please confirm allergies first.",
        allergy_turn=None,
        evidence=[[drug.name], ["allerg"]],
    )


def _conflict(case: Case, rng: random.Random, hard: bool) -> Draft:
    drug = case.scenario.drug
    if rng.random() < 0.5:
        other = case.weight + rng.choice((-1, 1)) * rng.randint(18, 30)
        turn = f"{case.nurse}: For the record, {case.possessive} weight on admission was {other} kg."
        reference = (
            f"Before we go on, the weight is recorded as both {case.weight} kg and {other} kg; "
            "please reconcile it before dosing."
        )
        weights = [[f"{case.weight} kg", f"{case.weight}kg"], [f"{other} kg", f"{other}kg"]]
        return Draft(case, _order_request(rng, drug.order()), reference, extra_turns=[turn], evidence=weights)
    turn = f"{case.pharmacist}: The pharmacy record lists a {drug.allergy_class} allergy for this patient."
    reference = (
        f"Before we go on, the patient reports no drug allergies but the pharmacy lists a "
        f"{drug.allergy_class} allergy; please reconcile this before ordering {drug.name}."
    )
    listed = [[drug.allergy_class], ["allerg"]]
    return Draft(
        replace(case, allergy=None), _order_request(rng, drug.order()), reference, extra_turns=[turn], evidence=listed
    )


def _error(case: Case, rng: random.Random, hard: bool) -> Draft:
    drug = case.scenario.drug
    wrong = drug.dose * 10
    return Draft(
        case,
        _order_request(rng, drug.order(wrong)),
        f"Please check the dose: {drug.name} {wrong} {drug.unit} is ten times the usual "
        f"{drug.dose} {drug.unit}; this looks like an error. Did you mean {drug.order()}?",
        evidence=[
            [drug.name],
            [f"{wrong} {drug.unit}", f"{wrong}{drug.unit}"],
            [f"{drug.dose} {drug.unit}", f"{drug.dose}{drug.unit}"],
        ],
    )


def _risk(case: Case, rng: random.Random, hard: bool) -> Draft:
    drug, alternative = case.scenario.drug, case.scenario.alternative
    return Draft(
        replace(case, allergy=drug.allergy_class),
        _order_request(rng, drug.order()),
        f"Caution: the patient is allergic to {drug.allergy_class} drugs and {drug.name} is one. "
        f"Consider {alternative.order()} instead.",
        evidence=[[drug.name], [drug.allergy_class]],
    )


def _ambiguity(case: Case, rng: random.Random, hard: bool) -> Draft:
    two = rng.sample(BP_MEDS, k=2)
    case = replace(case, home_meds=[*two, *(d for d in case.home_meds if d.allergy_class != "ACE inhibitor")])
    return Draft(
        case,
        rng.choice(INCREASE_REQUESTS).format(what="blood pressure medicine", pos=case.possessive),
        f"Could you clarify which blood pressure medicine you mean: {two[0].name} or {two[1].name}?",
        evidence=[[two[0].name], [two[1].name]],
    )


def _complete(case: Case, rng: random.Random, hard: bool) -> Draft:
    drug = case.scenario.drug
    if rng.random() < 0.3:
        one = rng.choice(BP_MEDS)
        case = replace(case, home_meds=[one, *(d for d in case.home_meds if d.allergy_class != "ACE inhibitor")])
        return Draft(
            case,
            rng.choice(INCREASE_REQUESTS).format(what="blood pressure medicine", pos=case.possessive),
            f"Done: {one.name} goes up from {one.dose} to {one.dose * 2} {one.unit} {one.frequency}.",
        )
    extra = []
    if rng.random() < 0.5:
        extra = [f"{case.nurse}: For the record, {case.possessive} weight on admission was {case.weight} kg."]
    return Draft(case, _order_request(rng, drug.order()), _done(drug.order()), extra_turns=extra)


def _distractor(case: Case, rng: random.Random, hard: bool) -> Draft:
    drug = case.scenario.drug
    extra = rng.choice(
        (
            f"{case.nurse}: ALT is 58 U/L, unchanged for five years according to {case.possessive} GP.",
            f"{case.pharmacist}: The pharmacy record lists a {rng.choice(UNRELATED_ALLERGIES)} allergy, "
            "which matches what the patient said.",
            f"{case.clinician}: {case.pronoun.capitalize()} had a similar episode ten years ago that settled fully.",
        )
    )
    return Draft(case, _order_request(rng, drug.order()), _done(drug.order()), extra_turns=[extra])


def _resolved(case: Case, rng: random.Random, hard: bool) -> Draft:
    drug, alternative = case.scenario.drug, case.scenario.alternative
    turn = (
        f"{case.pharmacist}: I flagged the {drug.allergy_class} allergy this morning, so we have "
        f"switched from {drug.name} to {alternative.name}."
    )
    return Draft(
        replace(case, allergy=drug.allergy_class),
        _order_request(rng, alternative.order()),
        _done(alternative.order()),
        extra_turns=[turn],
    )


BUILDERS: dict[str, Callable[[Case, random.Random, bool], Draft]] = {
    "ddx_reasoning": _diagnosis,
    "temporal_ordering": _timeline,
    "treatment_planning": _treatment,
    "test_interpretation": _interpretation,
    "case_summarization": _summary,
    "omission_detection": _missing,
    "consistency_check": _conflict,
    "error_correction": _error,
    "risk_identification": _risk,
    "ambiguity_clarification": _ambiguity,
    "no_intervention_complete": _complete,
    "no_intervention_distractor": _distractor,
    "no_intervention_resolved": _resolved,
}


def _split(rng: random.Random) -> str:
    draw = rng.random()
    for name, weight in SPLIT_WEIGHTS:
        if draw < weight:
            return name
        draw -= weight
    return SPLIT_WEIGHTS[-1][0]


def generate(tasks: int = 3000, seed: int = 0, taxonomy: Taxonomy | None = None) -> list[TaskRecord]:
    """`tasks` synthetic tasks, the same for the same seed; cases (not tasks) are split train/dev/test."""
    taxonomy = taxonomy or load_taxonomy()
    missing = sorted(set(taxonomy.categories) - set(BUILDERS))
    if missing:
        raise ValueError(f"the generator has no template for categories {missing} of {taxonomy.source}")
    rng = random.Random(seed)
    categories = list(BUILDERS)
    records: list[TaskRecord] = []
    index = 0
    while len(records) < tasks:
        case, split = _make_case(rng, index), _split(rng)
        for category in rng.sample(categories, k=min(4, tasks - len(records))):
            hard = rng.random() < HARD_FRACTION
            draft = BUILDERS[category](case, rng, hard)
            turns = draft.turns(rng, hard)
            spec = taxonomy.category(category)
            records.append(
                TaskRecord(
                    task_id=f"mini-{len(records):06d}",
                    case_id=case.case_id,
                    category=category,
                    task_type=spec.task_type,
                    messages=[
                        {"role": "system", "content": SYSTEM_PROMPT},
                        *({"role": "user", "content": t} for t in turns),
                    ],
                    gold_behavior=spec.behaviors[0],
                    split=split,
                    hard=hard,
                    reference=draft.reference,
                    evidence=draft.evidence,
                )
            )
        index += 1
    return records


def sample_text(tasks: int = 3000, seed: int = 0) -> str:
    """BehaviorBench-mini as JSON lines: the same arguments give the same text."""
    return "".join(json.dumps(record.to_row(), ensure_ascii=False) + "\n" for record in generate(tasks, seed))


def is_sample(path: Path) -> bool:
    """Whether `path` starts as every BehaviorBench-mini sample does, whatever its size and seed (its first task
    is `mini-000000`): a file of the user's own is not one."""
    with path.open("rb") as handle:
        return handle.read(len(SAMPLE_START)) == SAMPLE_START


def write_sample(out_dir: str | Path, tasks: int = 3000, seed: int = 0) -> Path:
    """Write BehaviorBench-mini as `tasks.jsonl` under `out_dir` (atomically) and return its path. An existing
    file there is replaced only if it is a BehaviorBench-mini sample too, of any size and seed (`is_sample`)."""
    path = Path(out_dir) / "tasks.jsonl"
    refuse_foreign(path, "--out", is_sample)
    write_text(path, sample_text(tasks, seed))
    return path
